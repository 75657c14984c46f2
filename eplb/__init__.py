"""Expert-parallel load balancing: load statistics, placement algorithms, move plans. Pure torch."""
