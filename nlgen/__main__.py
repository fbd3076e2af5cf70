from nlgen.cli.app import main

main()
