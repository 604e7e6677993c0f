from coi_container import main

main()
