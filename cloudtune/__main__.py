from cloudtune.cli import main

main()
