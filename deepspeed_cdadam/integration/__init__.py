"""Framework integrations. ``deepspeed`` is imported only by ``integration.deepspeed``."""
