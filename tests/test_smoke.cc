#include <gtest/gtest.h>
#include "test_util.h"
using namespace nsa_test;
TEST(Smoke, RefRuns) {
  Shape s; s.T = 200; s.Hq = 4; s.Hkv = 2;
  FwdCase c = make_case(s, config(32,16,64,4,1,2,128), NSA_DTYPE_F32, 1, true);
  std::string msg;
  ASSERT_EQ(run_fwd(NSA_BACKEND_REF, c, &msg), NSA_OK) << msg;
  EXPECT_TRUE(std::isfinite(c.o.at({0, 199, 3, 15})));
  EXPECT_EQ(c.idx_out.at_i32({0, 199, 1, 0}), 0);
}
