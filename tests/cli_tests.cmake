# Bad options of every `nsa` subcommand exit 2 with one line naming the option, never a crash;
# --help still exits 0 (cli_bad_options.sh). Each case is rejected at once (all of them take
# seconds); the timeout bounds a regression where bad values start real runs (20 s each).
if(NSA_BUILD_TOOLS)
  add_test(NAME cli_bad_options
           COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/cli_bad_options.sh $<TARGET_FILE:nsa_cli>)
  set_tests_properties(cli_bad_options PROPERTIES TIMEOUT 300)
endif()
