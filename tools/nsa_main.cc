// nsa: the command-line tool. `nsa info` describes the build and the machine; `nsa check` runs a
// random case through every backend and compares it with the float64 reference; `nsa bench`
// times the NSA forward against the dense baseline.
#include <iostream>
#include <map>
#include <string>

#include "commands.h"

int main(int argc, char** argv) {
  CLI::App app{"nsa: Native Sparse Attention (arXiv 2502.11089)"};
  app.require_subcommand(1);
  std::map<std::string, Command> commands;
  commands["info"] = add_info_command(app);
  commands["check"] = add_check_command(app);
  commands["bench"] = add_bench_command(app);
  CLI11_PARSE(app, argc, argv);
  for (const auto& [name, run] : commands) {
    if (app.got_subcommand(name)) return run();
  }
  return 2;
}
