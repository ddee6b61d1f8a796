"""Key services: HPKE keysets per population, public-key publication, key release to aggregators."""
