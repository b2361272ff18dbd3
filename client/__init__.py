"""Everything that runs inside a hospital: the ClientApp and the site's data path."""
