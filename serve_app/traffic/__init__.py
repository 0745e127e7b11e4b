"""Which requests are let in and where they go: API keys and quotas, the routing table
(variants, aliases, weighted splits), shadow comparisons. No Ray, no HTTP."""
