"""The web page served by the gateway at ``/``: chat and a live view of the market."""
