from coi_session import main

main()
