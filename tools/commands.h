// The subcommands of the `nsa` tool. Each registers its options on the CLI11 app and returns the
// function that runs it (exit code).
#pragma once

#include <CLI/CLI.hpp>
#include <functional>

using Command = std::function<int()>;

Command add_info_command(CLI::App& app);
Command add_check_command(CLI::App& app);
Command add_bench_command(CLI::App& app);
// Registered by add_bench_command as `nsa bench decode`.
Command add_bench_decode_command(CLI::App& bench);
