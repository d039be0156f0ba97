"""vlpre's transformer core: the one attention op and the one stack of blocks."""
