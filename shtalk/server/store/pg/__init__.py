"""The store on PostgreSQL: what several ``twistd shtalk`` processes share."""
