"""The maintained GPU benchmark scripts (listed in the README's Benchmark section); ``common`` holds their timers."""
