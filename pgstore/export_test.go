package pgstore

// MigrateTo lets the external tests take a schema to an older version.
var MigrateTo = migrateTo
