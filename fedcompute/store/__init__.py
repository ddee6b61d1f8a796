"""The only package that imports SQLAlchemy: models, repositories, migrations; and the blob stores."""
