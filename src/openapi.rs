//! OpenAPI schemas (`utoipa`) for the types whose JSON is hand-written rather than derived: a
//! session id (a UUID), a raw JSON value (any JSON, kept as sent) and a message's content (a
//! string or an array of parts). The other wire types derive `utoipa::ToSchema` where they are
//! declared. Compiled only with the `openapi` feature.

use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{
    AdditionalProperties, ArrayBuilder, KnownFormat, ObjectBuilder, OneOfBuilder, Schema,
    SchemaFormat, SchemaType, Type,
};
use utoipa::{PartialSchema, ToSchema};

use crate::model::{Content, RawJson, SessionId};

impl PartialSchema for SessionId {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)))
            .description(Some(
                "A session id: a UUID (a UUIDv7 when the server chooses it).",
            ))
            .into()
    }
}

impl ToSchema for SessionId {}

impl PartialSchema for RawJson {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(SchemaType::AnyValue)
            .description(Some(
                "Any JSON value, stored and sent back exactly as sent.",
            ))
            .into()
    }
}

impl ToSchema for RawJson {}

impl PartialSchema for Content {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .description(Some("The text.")),
            )
            .item(
                ArrayBuilder::new()
                    .items(
                        ObjectBuilder::new()
                            .schema_type(Type::Object)
                            .property(
                                "type",
                                ObjectBuilder::new()
                                    .schema_type(Type::String)
                                    .enum_values(Some([
                                        "text",
                                        "image_url",
                                        "input_audio",
                                        "file",
                                        "refusal",
                                    ])),
                            )
                            .required("type")
                            .additional_properties(Some(AdditionalProperties::FreeForm(true))),
                    )
                    .min_items(Some(1))
                    .description(Some(
                        "Typed parts, as the OpenAI chat format has them (`text`, `image_url`, \
                         `input_audio`, `file`, `refusal`), kept as the exact JSON sent.",
                    )),
            )
            .description(Some(
                "A message's content: a text, or an array of typed parts.",
            ))
            .into()
    }
}

impl ToSchema for Content {}
