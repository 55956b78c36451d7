// `fibquant`: the command-line client of fibquant-server (client/cli/cli.h, docs/OPERATIONS.md).
#include <iostream>
#include <string>
#include <vector>

#include "client/cli/cli.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  return fibquant::cli::RunCli(args, std::cout, std::cerr);
}
