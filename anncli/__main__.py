from anncli.cli import main

main()
