from coi_image import main

main()
