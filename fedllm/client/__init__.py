"""The client side: the ClientApp's message handlers, local training, precision, node config."""
