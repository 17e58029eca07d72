// nsa: the command-line tool. `nsa info` describes the build and the machine; `nsa check` runs a
// random case through every backend and compares it with the float64 reference; `nsa bench`
// times the NSA forward against the dense baseline.
//
// Exit codes: 0 success (and --help), 1 a failed check or run, 2 a bad command line. A bad
// option is one line on stderr, "nsa <subcommand>: <option>: <reason>": the options are checked
// while parsing (cli_validators.h), before anything is allocated.
#include <cstdio>
#include <exception>
#include <map>
#include <new>
#include <string>

#include "commands.h"

namespace {

// "nsa bench decode": the subcommands the command line reached, to prefix the error line.
std::string command_path(const CLI::App& app) {
  std::string path = "nsa";
  const CLI::App* at = &app;
  while (!at->get_subcommands().empty()) {
    at = at->get_subcommands().front();
    path += " " + at->get_name();
  }
  return path;
}

// The message as one line: a value quoted in it may hold a newline.
std::string one_line(std::string s) {
  for (char& c : s) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

void report(const CLI::App& app, const std::string& message) {
  std::fprintf(stderr, "%s: %s\n", command_path(app).c_str(), one_line(message).c_str());
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"nsa: Native Sparse Attention (arXiv 2502.11089)"};
  // Every exception ends here as one line: 2 for the command line, 1 for anything else, so that
  // none escapes to std::terminate.
  try {
    app.require_subcommand(1);
    std::map<std::string, Command> commands;
    commands["info"] = add_info_command(app);
    commands["check"] = add_check_command(app);
    commands["bench"] = add_bench_command(app);
    try {
      app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
      // --help is a ParseError with exit code 0: CLI11 prints the help.
      if (e.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success)) return app.exit(e);
      // Without a subcommand CLI11 reports the missing one before the stray arguments ("nsa
      // frob", "nsa --bogus"): the stray one is the mistake to name.
      const bool stray = dynamic_cast<const CLI::RequiredError*>(&e) != nullptr &&
                         app.get_subcommands().empty() && !app.remaining().empty();
      report(app, stray ? "unknown subcommand or option: " + app.remaining().front() : e.what());
      return 2;
    }
    for (const auto& [name, run] : commands) {
      if (app.got_subcommand(name)) return run();
    }
    return 2;
  } catch (const CLI::ParseError& e) {
    report(app, e.what());
    return 2;
  } catch (const std::bad_alloc&) {
    report(app, "out of memory");
    return 1;
  } catch (const std::exception& e) {
    report(app, std::string("unexpected error: ") + e.what());
    return 1;
  } catch (...) {
    report(app, "unexpected error");
    return 1;
  }
}
