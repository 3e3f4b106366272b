"""What an agent does: act (``rollout``), learn (``ppo``) and remember (``memory``: Redis)."""
