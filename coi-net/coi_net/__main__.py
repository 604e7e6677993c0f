from coi_net import main

main()
