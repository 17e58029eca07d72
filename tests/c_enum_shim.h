/* c_enum_shim.c: C API calls with an arbitrary int for an enum argument (see there). */
#ifndef NSA_TESTS_C_ENUM_SHIM_H_
#define NSA_TESTS_C_ENUM_SHIM_H_

#include "nsa/nsa.h"

#ifdef __cplusplus
extern "C" {
#endif

nsa_status nsa_test_set_backend_int(nsa_context* ctx, int backend);

#ifdef __cplusplus
}
#endif

#endif /* NSA_TESTS_C_ENUM_SHIM_H_ */
