from authserver.cli import main

main()
