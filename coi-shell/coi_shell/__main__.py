from coi_shell import main

main()
