/* Calls that pass an arbitrary int where the C API takes an enum, as a C caller may. In C an enum
 * object may hold any value of its underlying type; in C++, loading an enum outside its range is
 * undefined (clang's UBSan reports it), so the tests make such calls from here. */
#include "c_enum_shim.h"

/* The shim converts any int to the enum: that keeps its value only where the enum is int-sized
 * (the C API's enums are, and a C caller relies on it the same way). */
_Static_assert(sizeof(nsa_backend) == sizeof(int), "nsa_backend must be int-sized");
_Static_assert(sizeof(nsa_dtype) == sizeof(int), "nsa_dtype must be int-sized");

nsa_status nsa_test_set_backend_int(nsa_context* ctx, int backend) {
  return nsa_context_set_backend(ctx, (nsa_backend)backend);
}
