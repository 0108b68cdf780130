"""The one-shot command-line tools beside the exporter: ``qemu-iohang-check`` (`check`: does
every disk run the retry policy), ``qemu-iohang-report`` (`report`: incidents from one or many
exporters' journals) and the HTTP client of a running exporter they share (`api_client`).

May import: anything of the exporter; nothing imports it.
"""
