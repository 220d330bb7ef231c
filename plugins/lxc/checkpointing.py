"""How liblxc containers are checkpointed (the ``kumo_checkpointer`` of the lxc plugin)."""
