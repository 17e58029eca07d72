"""The descriptor dict nsa._core's calls take (torch-free: shared by nsa.np and the torch ops)."""


class Descs(dict):
    """Descriptors (data pointer, dtype code, shape, strides) keyed by the C params' field names,
    holding the arrays they point into. A descriptor is a raw pointer, so a temporary (a
    contiguous copy, an int32 conversion) must outlive the C call that reads it: it does, as long
    as this dict is the call's argument. None values are left out."""

    def __init__(self, to_desc, arrays: dict):
        super().__init__((k, to_desc(a, k)) for k, a in arrays.items() if a is not None)
        self.keep = arrays
