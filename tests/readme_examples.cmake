# Fails when the README's copy of an example differs from the file that is built and run.
file(READ "${README}" readme)
foreach(example ${EXAMPLES})
  file(READ "${example}" code)
  string(FIND "${readme}" "${code}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "README.md does not contain the current text of ${example}")
  endif()
endforeach()
