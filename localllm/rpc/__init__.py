"""RPC hosts: parsing ``--rpc`` endpoints, asking each server for its memory, and serving
this machine's backend (``localllm rpc-server``)."""
