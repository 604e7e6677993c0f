from coi_host import main

main()
