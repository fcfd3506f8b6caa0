from specx.cli import main

main()
