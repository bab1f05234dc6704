from inferplane.router.main import main

main()
