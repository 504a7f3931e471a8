from anncli.cli.main import main

main()
