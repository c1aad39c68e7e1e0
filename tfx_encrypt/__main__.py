from tfx_encrypt import _entry

_entry.main()
