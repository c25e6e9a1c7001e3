"""The guest's command channels: SSH, exec channels, keys, the tunnel, logins, the executor."""
