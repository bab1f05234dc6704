from inferplane.executor.main import main

main()
