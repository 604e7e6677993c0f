from coi_slot import main

main()
