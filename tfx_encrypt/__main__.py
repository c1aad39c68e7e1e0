from tfx_encrypt.cli import main

main(prog_name='tfx-encrypt')  # pylint: disable=no-value-for-parameter
