// Progress bar (client/cli/progress.h): the rendered line, and silence when disabled (the CLI
// disables it when stderr is not a terminal or with --quiet).
#include "client/cli/progress.h"

#include <cstdio>
#include <string>

#include "gtest/gtest.h"

namespace fibquant::cli {
namespace {

TEST(ProgressTest, RenderShowsBarCountsAndThroughput) {
  EXPECT_EQ(Progress::Render("compress", 8, 16, 2 * 1024 * 1024, 2.0, 10),
            "compress [#####.....] 8/16 pages  1.0 MiB/s  4 pages/s");
  EXPECT_EQ(Progress::Render("x", 0, 0, 0, 0.0, 4), "x [####] 0/0 pages  0 B/s  0 pages/s");
  EXPECT_EQ(HumanBytes(1536), "1.5 KiB");
}

TEST(ProgressTest, DisabledWritesNothing) {
  FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  {
    Progress p("compress", 4, /*enabled=*/false, f);
    p.Update(1, 100);
    p.Update(4, 400);
    p.Finish();
  }
  EXPECT_EQ(std::ftell(f), 0);
  {
    Progress p("compress", 4, /*enabled=*/true, f);
    p.Update(4, 400);
  }  // the destructor finishes the line
  EXPECT_GT(std::ftell(f), 0);
  std::fclose(f);
}

}  // namespace
}  // namespace fibquant::cli
