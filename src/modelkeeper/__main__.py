from modelkeeper.cli import main

main()
