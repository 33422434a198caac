//! Small builders shared by the migrations (portable column and index definitions).

use sea_orm_migration::{prelude::*, schema::*};

/// A column or table name.
pub fn c(name: &'static str) -> Alias {
    Alias::new(name)
}

/// A non-null timestamp with time zone.
pub fn ts(name: &'static str) -> ColumnDef {
    timestamp_with_time_zone(Alias::new(name))
}

/// A nullable timestamp with time zone.
pub fn ts_null(name: &'static str) -> ColumnDef {
    timestamp_with_time_zone_null(Alias::new(name))
}

/// A `CREATE TABLE` statement to add columns to.
pub fn table(name: &'static str) -> TableCreateStatement {
    Table::create().table(Alias::new(name)).to_owned()
}

/// An index on `cols` of `table`.
pub fn index(name: &'static str, table: &'static str, cols: &[&'static str], unique: bool) -> IndexCreateStatement {
    let mut i = Index::create();
    i.name(name).table(Alias::new(table));
    for col in cols {
        i.col(Alias::new(*col));
    }
    if unique {
        i.unique();
    }
    i.to_owned()
}
