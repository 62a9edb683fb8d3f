"""Early-exit federated fine-tuning: exit heads, budget tiers, depth-aware partial aggregation, compute accounting."""
