from coi_dispatch import main

main()
