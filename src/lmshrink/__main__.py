from lmshrink.cli import main

main()
