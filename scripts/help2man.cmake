# Writes a man page (roff) for PROGRAM from its own --help output into OUT_DIR/<name>.1.
# The --help texts are the reference (they list every flag with its default); the page wraps them
# verbatim so `man fibquant` and `fibquant --help` can never disagree.
# Usage: cmake -DPROGRAM=/path/to/prog -DOUT_DIR=dir -DVERSION=x.y.z -P help2man.cmake
get_filename_component(name "${PROGRAM}" NAME)
execute_process(COMMAND "${PROGRAM}" --help OUTPUT_VARIABLE help ERROR_VARIABLE help_err
  RESULT_VARIABLE rc)
if(NOT rc EQUAL 0 OR help STREQUAL "")
  message(FATAL_ERROR "${PROGRAM} --help failed (${rc}): ${help_err}")
endif()
# roff: a leading '.' or '\'' would be read as a request, and '\' is the escape character.
string(REPLACE "\\" "\\e" help "${help}")
string(REGEX REPLACE "(^|\n)([.'])" "\\1\\\\&\\2" help "${help}")
string(REGEX MATCH "^[^\n]*" summary "${help}")
if(name STREQUAL "fibquant-server")
  set(what "FibQuant KV-cache compression gRPC server")
else()
  set(what "command-line client of the FibQuant KV compression service")
endif()
string(TIMESTAMP date "%Y-%m-%d" UTC)
file(MAKE_DIRECTORY "${OUT_DIR}")
file(WRITE "${OUT_DIR}/${name}.1"
".TH ${name} 1 \"${date}\" \"fibquant ${VERSION}\" \"User Commands\"
.SH NAME
${name} \\- ${what}
.SH DESCRIPTION
The text below is the output of
.B ${name} --help.
Operator documentation: /usr/local/share/doc/fibquant/OPERATIONS.md (or the prefix it was
installed under) and docs/OPERATIONS.md in the source tree.
.PP
.nf
${help}
.fi
")
message(STATUS "Installing: ${OUT_DIR}/${name}.1")
