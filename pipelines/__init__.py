"""End-to-end jobs built on kdcache (recipes). The library never imports this package."""
