from tfx_encrypt.cli import main

main()  # pylint: disable=no-value-for-parameter
