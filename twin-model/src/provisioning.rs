//! Fleet provisioning templates (AWS IoT's `RegisterThing`): what a device that holds a
//! claim certificate becomes when it asks to be provisioned with some parameters.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::filter::{Filter, FilterTarget, Section};
use crate::{DeviceId, Rejection, ShadowName};

/// A provisioning template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProvisioningTemplate {
    /// 1-36 characters of `A-Z a-z 0-9 _ -` (AWS's template names).
    pub name: String,
    /// The thing's name, where `{{Param}}` stands for a parameter's value:
    /// `lamp-{{SerialNumber}}`.
    pub thing_name: String,
    /// The thing's attributes; `{{Param}}` in a string value stands for a parameter.
    #[serde(default)]
    pub attributes: Map<String, Value>,
    /// A fleet filter over the device to be made, which must hold: `id` is the thing name,
    /// `attributes.<Param>` a parameter (`attributes.SerialNumber != "0"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_provisioning_check: Option<String>,
    /// Returned to the device in `RegisterThing`'s answer.
    #[serde(default)]
    pub device_configuration: Map<String, Value>,
    pub enabled: bool,
}

/// What a template makes of a device's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Provisioned {
    pub thing: DeviceId,
    pub attributes: Map<String, Value>,
}

/// Whether `name` can name a template.
pub fn valid_template_name(name: &str) -> bool {
    (1..=36).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `text` with each `{{Param}}` replaced by the parameter's value; an unknown parameter
/// is refused.
fn substitute(text: &str, parameters: &Map<String, Value>) -> Result<String, Rejection> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| Rejection::bad_request("the template has a {{ without }}"))?;
        let name = after[..end].trim();
        let value = match parameters.get(name) {
            Some(Value::String(s)) => s.clone(),
            Some(other @ (Value::Number(_) | Value::Bool(_))) => other.to_string(),
            _ => {
                return Err(Rejection::bad_request(format!(
                    "the parameter {name} is missing or not a string"
                )));
            }
        };
        out.push_str(&value);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The device to be made, as the pre-provisioning check sees it.
struct Candidate<'a> {
    thing: &'a str,
    parameters: &'a Map<String, Value>,
}

impl FilterTarget for Candidate<'_> {
    fn id(&self) -> &str {
        self.thing
    }
    fn connected(&self) -> bool {
        false
    }
    fn attributes(&self) -> Option<&Map<String, Value>> {
        Some(self.parameters)
    }
    fn has_shadow(&self, _: &ShadowName) -> bool {
        false
    }
    fn section(&self, _: &ShadowName, _: Section) -> Option<&Map<String, Value>> {
        None
    }
}

impl ProvisioningTemplate {
    /// Checks the template itself: its name, its check's syntax.
    pub fn validate(&self) -> Result<(), Rejection> {
        if !valid_template_name(&self.name) {
            return Err(Rejection::bad_request(
                "a template name is 1-36 characters of A-Z a-z 0-9 _ -",
            ));
        }
        if self.thing_name.is_empty() {
            return Err(Rejection::bad_request("thingName is empty"));
        }
        if let Some(check) = &self.pre_provisioning_check {
            Filter::parse(check).map_err(|e| {
                Rejection::bad_request(format!("preProvisioningCheck does not parse: {e}"))
            })?;
        }
        Ok(())
    }

    /// The thing and attributes for a device's `parameters`, if the template is enabled
    /// and its check holds (`Forbidden` when not).
    pub fn provision(&self, parameters: &Map<String, Value>) -> Result<Provisioned, Rejection> {
        if !self.enabled {
            return Err(Rejection::new(
                crate::RejectionKind::Forbidden,
                format!("the provisioning template {} is disabled", self.name),
            ));
        }
        let name = substitute(&self.thing_name, parameters)?;
        let thing = DeviceId::parse(&name).map_err(|e| {
            Rejection::bad_request(format!("the template makes the thing name {name:?}: {e}"))
        })?;
        if let Some(check) = &self.pre_provisioning_check {
            let filter = Filter::parse(check)
                .map_err(|e| Rejection::bad_request(format!("preProvisioningCheck: {e}")))?;
            let candidate = Candidate {
                thing: thing.as_str(),
                parameters,
            };
            if !filter.matches(&candidate) {
                return Err(Rejection::new(
                    crate::RejectionKind::Forbidden,
                    "the template's pre-provisioning check refused these parameters",
                ));
            }
        }
        let mut attributes = Map::new();
        for (key, value) in &self.attributes {
            let value = match value {
                Value::String(s) => Value::String(substitute(s, parameters)?),
                other => other.clone(),
            };
            attributes.insert(key.clone(), value);
        }
        Ok(Provisioned { thing, attributes })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn template() -> ProvisioningTemplate {
        ProvisioningTemplate {
            name: "lamps".into(),
            thing_name: "lamp-{{SerialNumber}}".into(),
            attributes: json!({"model": "{{Model}}", "fleet": "north", "rev": 2})
                .as_object()
                .unwrap()
                .clone(),
            pre_provisioning_check: Some("attributes.SerialNumber != \"0000\"".into()),
            device_configuration: Map::new(),
            enabled: true,
        }
    }

    fn params(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn parameters_name_the_thing_and_fill_its_attributes() {
        let p = template()
            .provision(&params(json!({"SerialNumber": "A17", "Model": "L2"})))
            .unwrap();
        assert_eq!(p.thing.as_str(), "lamp-A17");
        assert_eq!(
            Value::Object(p.attributes),
            json!({"model": "L2", "fleet": "north", "rev": 2})
        );
    }

    #[test]
    fn the_check_a_missing_parameter_a_bad_name_and_a_disabled_template_refuse() {
        let t = template();
        let refused = t.provision(&params(json!({"SerialNumber": "0000", "Model": "L2"})));
        assert_eq!(refused.unwrap_err().kind, crate::RejectionKind::Forbidden);
        let missing = t.provision(&params(json!({"Model": "L2"}))).unwrap_err();
        assert!(missing.message.contains("SerialNumber"), "{missing}");
        let bad = t.provision(&params(json!({"SerialNumber": "a/b", "Model": "L2"})));
        assert!(bad.unwrap_err().message.contains("lamp-a/b"));
        let off = ProvisioningTemplate {
            enabled: false,
            ..template()
        };
        let e = off.provision(&params(json!({"SerialNumber": "1", "Model": "L2"})));
        assert!(e.unwrap_err().message.contains("disabled"));
    }

    #[test]
    fn a_template_is_checked_when_it_is_made() {
        assert!(template().validate().is_ok());
        let bad_name = ProvisioningTemplate {
            name: "a b".into(),
            ..template()
        };
        assert!(bad_name.validate().is_err());
        let bad_check = ProvisioningTemplate {
            pre_provisioning_check: Some("attributes.x >".into()),
            ..template()
        };
        assert!(
            bad_check
                .validate()
                .unwrap_err()
                .message
                .contains("does not parse")
        );
    }
}
