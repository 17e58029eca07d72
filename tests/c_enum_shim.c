/* Calls that pass an arbitrary int where the C API takes an enum, as a C caller may. In C an enum
 * object may hold any value of its underlying type; in C++, loading an enum outside its range is
 * undefined (clang's UBSan reports it), so the tests make such calls from here. */
#include "c_enum_shim.h"

nsa_status nsa_test_set_backend_int(nsa_context* ctx, int backend) {
  return nsa_context_set_backend(ctx, (nsa_backend)backend);
}
